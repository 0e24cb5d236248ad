"""Helpers for tests that run the real `imgq` CLI and `imgq worker` subprocesses."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.corpus import scene as jpeg_bytes  # noqa: F401  (re-exported for the e2e tests)
from tests.fixtures import warm_start
from tests.fixtures.services import settings_env

IMGQ = [sys.executable, "-m", "imgq.cli"]


def run_cli(
    settings: Any, *args: str, env_extra: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``imgq ARGS`` with ``settings``' environment: stdout, stderr and exit code, as a user's
    shell gets them (forked from the warm interpreter where it can be: tests/fixtures/warm_start.py)."""
    return warm_start.run("imgq.cli", list(args), settings_env(settings) | (env_extra or {}), timeout=120, cwd=cwd)


def enqueue_listing(settings: Any, tmp_path: Path, refs: list[str], *args: str) -> uuid.UUID:
    """`imgq enqueue caption -f LISTING` of ``refs`` (4 tokens: cheap captions); the job id."""
    listing = tmp_path / f"refs-{time.monotonic_ns()}.txt"
    listing.write_text("\n".join(refs))
    out = run_cli(settings, "enqueue", "caption", "-f", str(listing), "--max-new-tokens", "4", *args)
    assert out.returncode == 0, out.stderr
    return uuid.UUID(out.stdout.strip())


def start_worker(
    settings: Any, model_dir: Path, log_dir: Path, name: str, *extra: str, env_extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """One real `imgq worker` subprocess (through tests/e2e/fault_worker.py when faults are asked for)."""
    # A worker refuses (wrong_model) jobs that name another model than it serves.
    assert settings.caption_model == str(model_dir), "enqueue and worker settings must name the same model"
    env = settings_env(settings) | (env_extra or {})
    module = "tests.e2e.fault_worker" if env.get("IMGQ_TEST_FAULTS") else "imgq.cli"
    # Forked from a warm interpreter (tests/fixtures/warm_start.py): the same entry point, without
    # its ~7 CPU-seconds of imports; exec'd where a fork cannot reproduce the environment.
    return warm_start.start(module, ["worker", "--hostname", f"{name}@%h", *extra], env,  # type: ignore[return-value]
                            log_dir / f"worker-{name}.log")


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def workers(
    settings: Any, model_dir: Path, log_dir: Path, n: int = 1, *extra: str
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [start_worker(settings, model_dir, log_dir, f"w{i}", *extra) for i in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_finished(store: Any, jobs: list[Any], timeout: float, procs: list[subprocess.Popen[bytes]] | None = None,
                  log_dir: Path | None = None) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        totals = {"queued": 0, "running": 0, "done": 0, "dead": 0}
        for job in jobs:
            for k, v in store.counts(job).items():
                totals[k] = totals.get(k, 0) + v  # "cancelled" appears only for a cancelled job
        if totals["queued"] == totals["running"] == 0:
            return totals
        for proc in procs or []:
            if proc.poll() is not None and log_dir is not None:
                raise AssertionError(f"worker exited {proc.returncode}: " + _tail(log_dir))
        if time.monotonic() > deadline:
            raise AssertionError(f"unfinished after {timeout}s: {totals}\n" + (_tail(log_dir) if log_dir else ""))
        time.sleep(0.3)


def _tail(log_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(log_dir.glob("worker*.log")))


def check_job(settings: Any, job: str) -> str:
    """`imgq check JOB` must pass: zero missing, zero duplicates."""
    out = run_cli(settings, "check", job, "--require-finished")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "missing=0 duplicates=0" in out.stdout
    return out.stdout
