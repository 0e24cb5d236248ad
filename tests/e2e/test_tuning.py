"""A worker left on the default settings chooses its batch and threads, says so, and serves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imgq.db.store import Store
from tests.e2e.helpers import jpeg_bytes, run_cli, wait_finished, workers

pytestmark = pytest.mark.e2e


def test_a_worker_on_defaults_tunes_itself_logs_why_and_captions_everything(
    make_settings, image_root: Path, tiny_model_dir: Path, tmp_path: Path
):
    settings = make_settings(autotune=True, max_batch=0, torch_threads=0)
    refs = []
    for i in range(40):
        path = image_root / f"tune_{i:03d}.jpg"
        path.write_bytes(jpeg_bytes(320 + i, 240, i))
        refs.append(str(path))
    out = run_cli(settings, "enqueue", "caption", *refs)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    store = Store.from_url(settings.database_url)
    with workers(settings, tiny_model_dir, tmp_path, 1) as procs:
        totals = wait_finished(store, [job], timeout=120, procs=procs, log_dir=tmp_path)
    assert totals == {"queued": 0, "running": 0, "done": 40, "dead": 0}
    log = (tmp_path / "worker-w0.log").read_text()
    chosen = re.search(r"autotune: batch (\d+), torch threads (\d+): (.+) \(took ([\d.]+) s\)", log)
    assert chosen, log[-3000:]
    batch, threads = int(chosen[1]), int(chosen[2])
    assert batch >= 8 and batch & (batch - 1) == 0
    assert threads >= 1
    assert "ms per call" in chosen[3] and "decode" in chosen[3]
