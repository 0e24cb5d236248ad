"""The prepared GPU script's caption phases, run here on the tiny model: device time is 15 minutes a
session, so a bench that fails on the device must fail here first. GPU run 4 lost its caption
figures to a transformers-5.17 incompatibility that this test, run by `make compat` on 5.17, catches."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_caption_phases_run_and_every_point_has_a_figure(tmp_path: Path) -> None:
    out = tmp_path / "gpu-out"
    cmd = [sys.executable, "-m", "bench.gpu_bench", "--device", "cpu", "--arch", "tiny",
           "--phases", "model", "beam", "profile", "pipeline", "--batches", "4", "--profile-batch", "4",
           "--beam-batches", "4", "--seconds", "0.1", "--pipeline-images", "16", "--pipeline-batch", "8",
           "--threads", "1", "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "gpu.json").read_text())
    points = {k: v for k, v in results.items() if k.startswith(("model-only", "pipeline"))}
    assert sorted(points) == ["model-only eager beams=1 batch=4", "model-only eager beams=3 batch=4",
                              "model-only sdpa beams=1 batch=4", "model-only sdpa beams=3 batch=4",
                              "model-only sdpa+graphs beams=1 batch=4", "model-only sdpa+static beams=1 batch=4",
                              "pipeline in-process batch<=8 threads=1"]
    assert [k for k, v in points.items() if "error" in v or not v["img_s"] > 0] == []
    assert points["pipeline in-process batch<=8 threads=1"]["done"] == 16
    for variant in ("sdpa", "sdpa+static", "sdpa+graphs"):
        profile = results[f"profile {variant} greedy batch=4"]
        # Timings on a shared CPU: their presence is checked, not how they compare.
        assert "error" not in profile and profile["vision_ms"] > 0 and profile["wall_ms"] > 0
        assert math.isfinite(profile["decode_ms_per_step"])
        assert "aten::" in (out / f"profile-{variant.replace('+', '-')}.txt").read_text()
        agreement = results[f"agreement {variant} vs eager"]
        assert agreement["captions_differ"] == 0
        assert agreement["max_rel_logit_diff"] < 1e-5
