"""Soak: a larger job while workers are killed at random and restarted (`make soak`, not `make test`)."""

from __future__ import annotations

import random
import signal
import time

import pytest

from imgq.db.store import Store
from tests.e2e.helpers import check_job, jpeg_bytes, run_cli, start_worker, stop
from tests.e2e.test_faults import FAST

pytestmark = [pytest.mark.e2e, pytest.mark.soak]


def test_chaos_kills_during_a_2000_image_job(make_settings, image_root, slow_tiny_model_dir, tmp_path):
    model_dir = slow_tiny_model_dir  # slow enough that every kill lands while work is in flight
    settings = make_settings(caption_model=str(slow_tiny_model_dir), **{**FAST, "max_attempts": 8})
    refs = []
    for i in range(2000):
        path = image_root / f"soak_{i:05d}.jpg"
        path.write_bytes(jpeg_bytes(96 + i % 64, 72 + i % 48, seed=i))
        refs.append(str(path))
    listing = tmp_path / "refs.txt"
    listing.write_text("\n".join(refs))
    out = run_cli(settings, "enqueue", "caption", "-f", str(listing), "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    store = Store.from_url(settings.database_url)
    rng = random.Random(7)
    procs = [start_worker(settings, model_dir, tmp_path, f"w{i}", "--concurrency", "4") for i in range(2)]
    kills = 0
    started = time.monotonic()
    deadline = started + 1200
    try:
        while True:
            counts = store.counts(job)
            if counts["queued"] == counts["running"] == 0:
                break
            assert time.monotonic() < deadline, counts
            time.sleep(rng.uniform(3, 10))
            if kills < 6:
                victim = rng.randrange(len(procs))
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait()
                kills += 1
                procs[victim] = start_worker(settings, model_dir, tmp_path, f"r{kills}", "--concurrency", "4")
    finally:
        for proc in procs:
            stop(proc)
    print(f"\nsoak: 2000 images, {kills} SIGKILLs during the job, {time.monotonic() - started:.0f} s")
    assert kills == 6, f"the job finished after only {kills} kills; the soak needs a longer job"
    assert store.counts(job) == {"queued": 0, "running": 0, "done": 2000, "dead": 0}
    check_job(settings, job)
