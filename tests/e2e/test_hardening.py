"""Hardening, with a real `imgq worker`: messages that can never settle end instead of looping, and
a forged message for a real job is processed as the job's record says."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from imgq.celeryconf import make_celery
from imgq.contract import TASK_NAME, CaptionParams
from imgq.db.store import Store
from tests.e2e.helpers import check_job, jpeg_bytes, run_cli, wait_finished, workers

pytestmark = pytest.mark.e2e


def test_unsettleable_messages_end_and_forged_ones_follow_the_record(
    make_settings, redis_server, image_root: Path, tiny_model_dir: Path, tmp_path: Path
):
    settings = make_settings()
    real, decoy = image_root / "real.jpg", image_root / "decoy.jpg"
    real.write_bytes(jpeg_bytes(160, 120, 1))
    decoy.write_bytes(jpeg_bytes(160, 120, 2))
    out = run_cli(settings, "enqueue", "caption", str(real), "--max-new-tokens", "5")
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    # Drain the real message first, so the forged one below finds the item already done.
    app = make_celery(settings)
    tasks = [{"kind": "caption", "model": settings.caption_model, "params": CaptionParams(num_beams=4).canonical()}]
    bad = [
        {"v": 2, "job": "not-a-uuid", "tasks": tasks, "items": [[0, str(real)]]},
        {"v": 2, "job": job, "tasks": tasks, "items": [[2**40, str(real)]]},
        {"v": 2, "job": str(uuid.uuid4()), "tasks": tasks, "items": [[0, str(real)]]},
        {"v": 7, "job": job, "items": [[0, str(decoy)]]},  # unknown version: processed as recorded
    ]
    for payload in bad:
        app.send_task(TASK_NAME, kwargs={"msg": payload}, queue=settings.queue)
    store = Store.from_url(settings.database_url)
    broker = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    with workers(settings, tiny_model_dir, tmp_path, 1) as procs:
        wait_finished(store, [uuid.UUID(job)], timeout=60, procs=procs, log_dir=tmp_path)
        deadline = time.monotonic() + 20
        while broker.llen(settings.queue) or broker.zcard("unacked_index"):
            assert time.monotonic() < deadline, "messages still circling"
            time.sleep(0.3)
        time.sleep(3)  # a requeue loop would put them back within 2 s
        assert broker.llen(settings.queue) == 0 and broker.zcard("unacked_index") == 0
    log = (tmp_path / "worker-w0.log").read_text()
    assert log.count("dropping message") == 3, log[-3000:]
    assert "requeueing" not in log
    rows = list(store.results(uuid.UUID(job)))
    store.engine.dispose()
    assert [(r["ref"], r["state"]) for r in rows] == [(str(real), "done")]
    check_job(settings, job)


def test_a_broken_model_stops_its_worker_instead_of_dead_lettering_the_queue(
    make_settings, image_root: Path, tiny_model_dir: Path, tmp_path: Path
):
    from tests.e2e.helpers import start_worker

    settings = make_settings(max_attempts=8, retry_base_s=0.2, retry_max_s=0.5)
    refs = []
    for i in range(12):
        path = image_root / f"m{i}.jpg"
        path.write_bytes(jpeg_bytes(160, 120, 70 + i))
        refs.append(str(path))
    out = run_cli(settings, "enqueue", "caption", *refs, "--max-new-tokens", "4", "--refs-per-message", "4")
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    broken = start_worker(settings, tiny_model_dir, tmp_path, "broken", env_extra={"IMGQ_TEST_FAULTS": "broken_model"})
    try:
        assert broken.wait(90) == 3, "an unhealthy worker exits 3 for its supervisor"
    finally:
        if broken.poll() is None:
            broken.kill()
    log = (tmp_path / "worker-broken.log").read_text()
    assert "model unhealthy" in log and "error[model_unhealthy]" in log
    store = Store.from_url(settings.database_url)
    counts = store.counts(uuid.UUID(job))
    assert counts["dead"] == 0 and counts["done"] == 0, counts
    with workers(settings, tiny_model_dir, tmp_path, 1) as procs:  # a healthy worker takes over
        # Belt and braces: re-publish anything the broken worker left unacknowledged.
        run_cli(settings, "reconcile", "--job", job, "--older-than", "0")
        totals = wait_finished(store, [uuid.UUID(job)], timeout=90, procs=procs, log_dir=tmp_path)
    store.engine.dispose()
    assert totals == {"queued": 0, "running": 0, "done": 12, "dead": 0}
    check_job(settings, job)


def test_a_wedged_model_call_fails_healthz_and_stops_its_worker_and_its_items_finish_elsewhere(
    make_settings, image_root: Path, tiny_model_dir: Path, tmp_path: Path
):
    """A model call that never returns raised nothing, so no strike was ever counted: the worker
    lived on, took messages that only timed out, and /healthz said ok (found by review). Past
    IMGQ_TASK_TIME_LIMIT_S the call makes the worker unhealthy: /healthz 503, the worker stops."""
    import urllib.error
    import urllib.request

    from imgq.embedded import free_port
    from tests.e2e.helpers import start_worker

    port = free_port()
    settings = make_settings(task_time_limit_s=4, visibility_timeout_s=30, shutdown_grace_s=2, metrics_port=port,
                             retry_base_s=0.2, retry_max_s=0.5, heartbeat_s=1, worker_dead_after_s=3)
    refs = []
    for i in range(6):
        path = image_root / f"h{i}.jpg"
        path.write_bytes(jpeg_bytes(160, 120, 500 + i))
        refs.append(str(path))
    out = run_cli(settings, "enqueue", "caption", *refs, "--max-new-tokens", "4", "--refs-per-message", "3")
    assert out.returncode == 0, out.stderr
    job = uuid.UUID(out.stdout.strip())
    hung = start_worker(settings, tiny_model_dir, tmp_path, "hung", env_extra={"IMGQ_TEST_FAULTS": "hung_model"})
    answers: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 90
        while hung.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                    answers.append((response.status, response.read().decode()))
            except urllib.error.HTTPError as exc:
                answers.append((exc.code, exc.read().decode()))
            except OSError:
                pass  # not listening yet, or gone
            time.sleep(0.2)
        code = hung.wait(30)
        print(f"exit {code}, {time.monotonic() - deadline + 90:.1f} s after it started")
        assert code in (3, 70), "a wedged worker stops, for its supervisor to restart"
    finally:
        if hung.poll() is None:
            hung.kill()
    assert (200, "ok\n") in answers
    assert any(status == 503 and "inference is wedged" in body for status, body in answers), answers[-3:]
    assert "model unhealthy: one model call has run for" in (tmp_path / "worker-hung.log").read_text()
    settings = settings.model_copy(update={"metrics_port": 0})
    store = Store.from_url(settings.database_url)
    with workers(settings, tiny_model_dir, tmp_path, 1) as procs:  # a healthy worker takes over
        run_cli(settings, "reconcile", "--job", str(job), "--older-than", "0")
        took = time.monotonic()
        totals = wait_finished(store, [job], timeout=120, procs=procs, log_dir=tmp_path)
        print(f"finished elsewhere in {time.monotonic() - took:.1f} s")
    store.engine.dispose()
    assert totals == {"queued": 0, "running": 0, "done": 6, "dead": 0}
    check_job(settings, str(job))


def test_a_worker_that_exits_past_its_shutdown_grace_has_its_items_reaped(
    make_settings, image_root: Path, slow_tiny_model_dir: Path, tmp_path: Path
):
    import signal

    from tests.e2e.helpers import start_worker, stop

    # A message the victim had reserved but not yet claimed leaves its items queued, not running:
    # the reaper does not see them; the feeder's lost-message sweep does, once the queue drains.
    settings = make_settings(caption_model=str(slow_tiny_model_dir), shutdown_grace_s=1, retry_max_s=1,
                             reconcile_after_s=8, reconcile_interval_s=1)
    refs = []
    for i in range(160):
        path = image_root / f"g{i:03d}.jpg"
        path.write_bytes(jpeg_bytes(160, 120, 300 + i))
        refs.append(str(path))
    store = Store.from_url(settings.database_url)
    # The victim's batches each take 3 s more, so when it is signalled it surely holds work that
    # outlasts the 1 s grace (with the plain model, a fast run could finish it in time: exit 0).
    victim = start_worker(settings, slow_tiny_model_dir, tmp_path, "victim",
                          env_extra={"IMGQ_TEST_FAULTS": "slow_model", "IMGQ_TEST_SLOW_S": "3"})
    survivor = start_worker(settings, slow_tiny_model_dir, tmp_path, "survivor")
    try:
        deadline = time.monotonic() + 90
        with store.engine.connect() as conn:
            while conn.execute(text("SELECT count(*) FROM workers")).scalar_one() < 2:
                assert time.monotonic() < deadline, "workers never started"
                time.sleep(0.2)
                conn.rollback()
        listing = tmp_path / "refs.txt"
        listing.write_text("\n".join(refs))
        out = run_cli(settings, "enqueue", "caption", "-f", str(listing), "--refs-per-message", "4",
                      "--max-new-tokens", "6")
        assert out.returncode == 0, out.stderr
        job = uuid.UUID(out.stdout.strip())
        held = text("SELECT count(*) FROM job_items WHERE state = 'running' AND worker LIKE :pid")
        with store.engine.connect() as conn:
            while conn.execute(held, {"pid": f"%:{victim.pid}"}).scalar_one() == 0:
                assert time.monotonic() < deadline, "the victim never claimed an item"
                time.sleep(0.1)
                conn.rollback()
        victim.send_signal(signal.SIGTERM)
        assert victim.wait(30) == 70, "past the 1 s grace the worker exits 70 with messages unacknowledged"
        left = time.monotonic()
        totals = wait_finished(store, [job], timeout=90)
        print(f"all final {time.monotonic() - left:.1f} s after the worker left")
    finally:
        stop(survivor)
        if victim.poll() is None:
            victim.kill()
    store.engine.dispose()
    assert totals == {"queued": 0, "running": 0, "done": 160, "dead": 0}
    check_job(settings, str(job))
