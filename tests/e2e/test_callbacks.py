"""A real `imgq worker` sends the job-finished callback: once the job's last item settles, the
receiver gets one POST that the documented snippet verifies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

from imgq.callbacks import check_callback_url
from imgq.db.store import Store
from tests.callback_receiver import Receiver
from tests.e2e.helpers import jpeg_bytes, run_cli, wait_finished, workers
from tests.snippets import documented_verifier

pytestmark = pytest.mark.e2e


def test_a_worker_posts_the_signed_summary_when_the_job_finishes(make_settings, image_root: Path,
                                                                 tiny_model_dir: Path, tmp_path: Path):
    settings = make_settings(callback_hosts=["127.0.0.1"], callback_interval_s=0.2)
    refs = []
    for i in range(3):
        path = image_root / f"cb_{i}.jpg"
        path.write_bytes(jpeg_bytes(64, 48, i))
        refs.append(str(path))
    refs.append(str(image_root / "missing.jpg"))  # dead-lettered: not_found
    with Receiver() as receiver:
        out = run_cli(settings, "enqueue", "caption", *refs, "--max-new-tokens", "4")
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip()
        store = Store.from_url(settings.database_url)
        with store.engine.begin() as conn:  # what POST /v1/jobs stores for a job with a callback_url
            conn.execute(text("INSERT INTO tenants (name, callback_secret) VALUES ('e2e', 'sek')"))
            conn.execute(text("UPDATE jobs SET tenant = 'e2e', callback_url = :u, callback_state = 'pending', "
                              "callback_next_at = now() WHERE id = :j"),
                         {"u": check_callback_url(f"http://127.0.0.1:{receiver.port}/done", settings), "j": job})
        with workers(settings, tiny_model_dir, tmp_path, 1) as procs:
            wait_finished(store, [job], timeout=120, procs=procs, log_dir=tmp_path)
            [request] = receiver.wait(1, timeout_s=30)
    assert documented_verifier()("sek", request["headers"]["Imgq-Signature"], request["body"])
    summary = json.loads(request["body"])
    assert summary["job"] == job and summary["total"] == 4
    assert summary["counts"] == {"queued": 0, "running": 0, "done": 3, "dead": 1, "cancelled": 0}
    assert summary["dead_letters"] == {"not_found": 1}
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT callback_state FROM jobs WHERE id = :j"), {"j": job}).scalar() == "delivered"
    store.engine.dispose()
