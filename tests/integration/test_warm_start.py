"""The e2e tests' workers are forked from a warm interpreter (tests/fixtures/warm_start.py): a fork
must behave as the exec'd command it stands in for, or fall back to exec."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures import warm_start
from tests.fixtures.services import settings_env

pytestmark = pytest.mark.skipif(os.environ.get("IMGQ_TEST_WORKER_START") == "exec",
                                reason="IMGQ_TEST_WORKER_START=exec: nothing is forked")


def _ready(log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "ready." not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)


def _both(args: list[str], env: dict[str, str]) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    """(exit code, stdout, stderr) of ``imgq ARGS`` forked, then exec'd, with one environment."""
    forked = warm_start.run("imgq.cli", args, env, timeout=60)
    assert forked.args == ["imgq.cli", *args], "this environment is the server's: it must fork"
    execd = subprocess.run([sys.executable, "-m", "imgq.cli", *args], env=env, capture_output=True, text=True,
                           timeout=60)
    return (forked.returncode, forked.stdout, forked.stderr), (execd.returncode, execd.stdout, execd.stderr)


def test_a_fork_prints_and_exits_as_the_exec_d_command_with_its_own_environment(make_settings):
    settings = make_settings(queue="from-the-request", max_batch=7)
    env = settings_env(settings)
    forked, execd = _both(["config"], env)
    assert forked == execd
    assert forked[0] == 0 and "IMGQ_QUEUE=from-the-request\n" in forked[1] and "IMGQ_MAX_BATCH=7\n" in forked[1]
    assert forked[2] == ""  # nothing on stderr: no warning of an import, either way
    # A usage error: its one line on stderr and exit code 2, both ways.
    forked, execd = _both(["status"], env)
    assert forked == execd and forked[0] == 2 and forked[1] == "" and forked[2].startswith("error[usage]: "), forked


def test_a_forked_worker_ends_as_popen_reports_signals(make_settings, tiny_model_dir: Path, tmp_path: Path):
    settings = make_settings()
    env = settings_env(settings)
    procs = [warm_start.start("imgq.cli", ["worker", "--hostname", f"w{i}@%h"], env, tmp_path / f"w{i}.log")
             for i in range(2)]
    assert all(isinstance(p, warm_start.WarmProcess) for p in procs)
    assert all((tmp_path / f"w{i}.log").exists() for i in range(2)), "the logs are there when the starts return"
    for i in range(2):
        _ready(tmp_path / f"w{i}.log")
    assert {p.pid for p in procs} & {os.getpid()} == set() and len({p.pid for p in procs}) == 2
    procs[0].send_signal(signal.SIGKILL)
    procs[1].send_signal(signal.SIGTERM)  # a warm shutdown: exit 0, as `imgq worker` exits
    assert [p.wait(30) for p in procs] == [-signal.SIGKILL, 0]
    assert "Warm shutdown" in (tmp_path / "w1.log").read_text()
    procs[0].kill()  # after its end: nothing, as Popen does (the PID may be another process's now)


def test_an_environment_a_fork_cannot_reproduce_is_exec_d(tmp_path: Path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
    # Read at import (by huggingface_hub, torch): the warm interpreter has imported with the old value.
    execd = [warm_start.start("imgq.cli", ["--help"], base | {"HF_HUB_OFFLINE": "0"}, tmp_path / "a.log"),
             warm_start.start("imgq.cli", ["--help"], base | {"OMP_NUM_THREADS": "3"}, tmp_path / "b.log"),
             warm_start.start("json.tool", ["--help"], base, tmp_path / "c.log")]  # not an entry point it knows
    assert all(isinstance(p, subprocess.Popen) for p in execd) and [p.wait(60) for p in execd] == [0, 0, 0]
    # Read only when a command runs: forked.
    runtime = base | {"IMGQ_QUEUE": "q", "AWS_ACCESS_KEY_ID": "other", "COLUMNS": "99", "XDG_RUNTIME_DIR": "/x"}
    proc = warm_start.start("imgq.cli", ["--help"], runtime, tmp_path / "d.log")
    assert isinstance(proc, warm_start.WarmProcess) and proc.wait(60) == 0


def test_a_forked_command_past_its_timeout_is_killed_and_raises_as_subprocess_run(make_settings, tiny_model_dir):
    env = settings_env(make_settings())
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        warm_start.run("imgq.cli", ["worker", "--hostname", "t@%h"], env, timeout=2)  # a worker never returns
    assert time.monotonic() - started < 10
