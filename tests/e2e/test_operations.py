"""What an operator runs: Flower behind authentication, the worker's /metrics and probes, and a
graceful SIGTERM. Real `imgq flower` and `imgq worker` subprocesses, a real headless Chromium."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from imgq.celeryconf import make_celery
from imgq.db.store import Store
from imgq.embedded import free_port
from tests.e2e.helpers import IMGQ, check_job, jpeg_bytes, run_cli, start_worker, stop, wait_finished
from tests.fixtures.services import settings_env

pytestmark = pytest.mark.e2e

CREDENTIALS = "ops:correct-horse"


def _get(url: str, auth: str | None = None, timeout: float = 5) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def _wait_http(url: str, timeout: float = 60, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before answering {url}")
        try:
            _get(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_flower_needs_credentials_and_shows_each_message_with_its_job_and_fate(
    make_settings, image_root: Path, tmp_path: Path, tiny_model_dir: Path
):
    metrics_port, flower_port = free_port(), free_port()
    settings = make_settings(metrics_port=metrics_port, metrics_token="scrape-token",
                             flower_basic_auth=CREDENTIALS)
    refused = run_cli(make_settings(), "flower", "--port", str(flower_port))
    assert refused.returncode == 2 and refused.stderr.startswith("error[config_error]: Flower needs authentication")

    with open(tmp_path / "flower.log", "wb") as log:
        flower = subprocess.Popen([*IMGQ, "flower", "--port", str(flower_port), "--address", "127.0.0.1",
                                   "--db", str(tmp_path / "flower.db")], env=settings_env(settings),
                                  stdout=log, stderr=subprocess.STDOUT)
    worker = start_worker(settings, tiny_model_dir, tmp_path, "ops")
    base = f"http://127.0.0.1:{flower_port}"
    try:
        _wait_http(f"{base}/healthcheck", proc=flower)
        _wait_http(f"http://127.0.0.1:{metrics_port}/healthz", proc=worker)
        deadline = time.monotonic() + 60
        while _get(f"http://127.0.0.1:{metrics_port}/readyz")[0] != 200:
            assert time.monotonic() < deadline, "the worker never became ready"
            time.sleep(0.3)
        before = _get(f"http://127.0.0.1:{metrics_port}/metrics", "Bearer scrape-token")[1]

        (image_root / "good.jpg").write_bytes(jpeg_bytes(64, 48, 1))
        (image_root / "empty.jpg").write_bytes(b"")
        out = run_cli(settings, "enqueue", "caption", str(image_root / "good.jpg"), str(image_root / "empty.jpg"))
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip()
        store = Store.from_url(settings.sync_database_url)
        assert wait_finished(store, [uuid.UUID(job)], timeout=60)["dead"] == 1
        store.engine.dispose()

        # Without credentials: 401 for the UI, the API and /metrics alike.
        for path in ("/", "/tasks", "/api/tasks", "/metrics"):
            assert _get(base + path)[0] == 401, path
        auth = _basic(CREDENTIALS)
        deadline = time.monotonic() + 30
        while True:
            status, body = _get(f"{base}/api/tasks", auth)
            tasks = json.loads(body) if status == 200 else {}
            mine = [t for t in tasks.values() if job in (t.get("kwargs") or "") and t.get("result")]
            if mine:
                break
            assert time.monotonic() < deadline, f"Flower never showed the task: {status} {body[:500]}"
            time.sleep(0.5)
        assert mine[0]["name"] == "imgq.process" and mine[0]["state"] == "SUCCESS"
        assert f"<job {job}, caption, 2 items>" in mine[0]["kwargs"]
        assert "'outcome': 'dead_lettered'" in mine[0]["result"] and "'dead': 1" in mine[0]["result"]
        types = json.loads(_get(f"{base}/api/task/types", auth)[1])["task-types"]
        assert "imgq.process" in types
        flower_metrics = _get(f"{base}/metrics", auth)
        assert flower_metrics[0] == 200 and "flower_events_total" in flower_metrics[1]
        # The workers' families are the workers' alone: Flower served them too, all zeros.
        assert "imgq_" not in flower_metrics[1], [ln for ln in flower_metrics[1].splitlines() if "imgq_" in ln][:5]

        # The worker's own /metrics: the token is required, and the counters moved.
        assert _get(f"http://127.0.0.1:{metrics_port}/metrics")[0] == 401
        after = _get(f"http://127.0.0.1:{metrics_port}/metrics", "Bearer scrape-token")[1]

        def moved(name: str) -> float:
            return _metric(after, name) - _metric(before, name)

        assert moved('imgq_images_total{kind="caption"}') == 1
        assert moved('imgq_dead_letters_total{code="empty"}') == 1
        assert moved('imgq_failures_total{code="empty"}') == 1
        assert moved("imgq_batch_size_count") >= 1
        assert 'imgq_queue_depth{queue="imgq"}' in after and _metric(after, "imgq_worker_rss_bytes") > 10e6
        # Its consumer opened its channel on a writable Redis (imgq.transport): nothing refused.
        assert 'imgq_broker_refusing{reason="maxmemory"} 0.0' in after.splitlines()
        assert 'imgq_broker_refusing{reason="replica"} 0.0' in after.splitlines()
        assert "job" not in "".join(line.split(" ")[0] for line in after.splitlines() if line.startswith("imgq_"))

        # A real browser renders Flower's tasks page, with the task in it.
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            pytest.fail("chromium is missing: `make test` installs it (apt-get install chromium)")
        task_id = mine[0]["uuid"]
        url = f"http://{CREDENTIALS}@127.0.0.1:{flower_port}/tasks"
        common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                  "--virtual-time-budget=8000"]
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        assert task_id in dom.stdout, dom.stderr[-2000:]
        shot = tmp_path / "flower-tasks.png"
        subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

        # Remote control is read-only by default: what Flower reads answers; shutdown and the
        # configuration dump get an error reply (no traceback in the worker's log), and it lives on.
        control = make_celery(settings).control
        assert control.inspect(timeout=5).stats(), "inspect stats (Flower's workers page) got no answer"
        for command in ("shutdown", "conf"):
            [reply] = control.broadcast(command, reply=True, timeout=5)
            [(_, answer)] = reply.items()
            assert "IMGQ_REMOTE_CONTROL=read-only" in answer["error"], answer
        time.sleep(1)
        assert worker.poll() is None, "a broadcast shutdown stopped a read-only worker"
        assert "pidbox command error" not in (tmp_path / "worker-ops.log").read_text(errors="replace")
    finally:
        stop(worker)
        stop(flower)


def test_sigterm_mid_job_settles_in_flight_work_and_exits_0(
    make_settings, image_root: Path, tmp_path: Path, slow_tiny_model_dir: Path
):
    settings = make_settings(caption_model=str(slow_tiny_model_dir), shutdown_grace_s=45, max_batch=4)
    refs = []
    for i in range(48):
        (image_root / f"t{i:02d}.jpg").write_bytes(jpeg_bytes(96, 72, 700 + i))
        refs.append(str(image_root / f"t{i:02d}.jpg"))
    (tmp_path / "refs.txt").write_text("\n".join(refs))
    store = Store.from_url(settings.sync_database_url)
    first = start_worker(settings, slow_tiny_model_dir, tmp_path, "first", "--concurrency", "4")
    second = None
    try:
        out = run_cli(settings, "enqueue", "caption", "-f", str(tmp_path / "refs.txt"), "--refs-per-message", "4")
        assert out.returncode == 0, out.stderr
        job = uuid.UUID(out.stdout.strip())
        deadline = time.monotonic() + 90
        while store.counts(job)["done"] < 4:
            assert time.monotonic() < deadline and first.poll() is None, "no progress"
            time.sleep(0.1)
        first.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert first.wait(45) == 0, "within the grace period the worker settles its messages and exits 0"
        print(f"worker left {time.monotonic() - started:.1f} s after SIGTERM")
        assert store.counts(job)["running"] == 0, "nothing may stay claimed by a worker that left"
        second = start_worker(settings, slow_tiny_model_dir, tmp_path, "second")
        totals = wait_finished(store, [job], timeout=120, procs=[second], log_dir=tmp_path)
    finally:
        stop(first)
        if second is not None:
            stop(second)
    store.engine.dispose()
    assert totals == {"queued": 0, "running": 0, "done": 48, "dead": 0}
    check_job(settings, str(job))
