"""The CLI as a user's own session meets it: embedded services on demand, whole help, one error
line for every failure, purged counts, and a demo without warnings. All through the real CLI."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from imgq.db.store import Store
from imgq.ports import DeadRow
from tests.e2e.helpers import IMGQ, jpeg_bytes, run_cli

pytestmark = pytest.mark.e2e

JOB = "0b8f7f5e-1111-4222-8333-944455556666"


def _one_error_line(out: subprocess.CompletedProcess[str], code: str, rc: int) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == rc, (out.returncode, out.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error[{code}]: "), out.stderr
    return lines[0]


def _clean_env() -> dict[str, str]:
    """No IMGQ_* and no XDG_RUNTIME_DIR: a fresh user's shell (CI's has neither)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_") and k != "XDG_RUNTIME_DIR"}


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_dev_up_exports_services_that_work_and_down_leaves_no_process(tmp_path: Path):
    folder = tmp_path / "dev"
    env = _clean_env()
    # `eval "$(imgq dev up)"` must return: no service may hold the command substitution's pipe.
    script = (f'eval "$({" ".join(IMGQ)} dev up --dir {folder} --s3)" && env | grep -E "^(IMGQ|AWS)_" && '
              f'{" ".join(IMGQ)} status {JOB}; echo "status-rc=$?"')
    shell = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    exported = dict(line.split("=", 1) for line in shell.stdout.splitlines() if "=" in line and "rc=" not in line)
    assert {"IMGQ_DATABASE_URL", "IMGQ_BROKER_URL", "IMGQ_S3_ENDPOINT_URL", "IMGQ_ALLOWED_BUCKETS"} <= set(exported)
    # The database answered (and was migrated): an unknown job is not_found, not db_unavailable.
    assert "error[not_found]" in shell.stderr and "status-rc=1" in shell.stdout, shell.stderr
    assert "Warning" not in shell.stderr

    recorded = json.loads((folder / "services.json").read_text())["services"]
    pids = {s["name"]: s["pid"] for s in recorded}
    assert set(pids) == {"postgres", "redis", "s3"} and all(_alive(pid) for pid in pids.values())
    status = subprocess.run([*IMGQ, "dev", "status", "--dir", str(folder)], env=env, capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.count("running") == 3, status.stdout

    again = subprocess.run([*IMGQ, "dev", "up", "--dir", str(folder), "--s3"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and f"pid {pids['redis']}," in again.stderr  # reused, not a second copy

    down = subprocess.run([*IMGQ, "dev", "down", "--dir", str(folder)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert down.returncode == 0 and down.stderr.count(": stopped") == 3, down.stderr
    assert not any(_alive(pid) for pid in pids.values())
    status = subprocess.run([*IMGQ, "dev", "status", "--dir", str(folder)], env=env, capture_output=True, text=True)
    assert status.returncode == 1 and "no services recorded" in status.stdout


def test_commands_with_the_broker_down_print_one_line_and_reads_still_work(make_settings, tmp_path: Path):
    settings = make_settings(broker_url=f"redis+socket://{tmp_path}/nobody.sock")
    store = Store.from_url(settings.sync_database_url)
    from tests.jobs import caption_task, create_job

    job = create_job(store, [caption_task(settings.caption_model)], ["/x/a.jpg"])
    store.write_dead([DeadRow(job, 0, "not_found", "gone", "w1")])
    # The retry is committed before anything is published: it says so and succeeds, with a warning.
    retried = run_cli(settings, "dlq", "retry", "--job", str(job))
    assert retried.returncode == 0 and retried.stdout == "re-queued 1 items\n", retried.stderr
    assert retried.stderr.startswith("warning[publish_failed]: ") and len(retried.stderr.splitlines()) == 1
    _one_error_line(run_cli(settings, "reconcile", "--older-than", "0"), "broker_unavailable", 1)
    # Nothing is lost: the retried item waits in Postgres as queued for the broker to come back.
    assert store.counts(job)["queued"] == 1
    for args in (["status", str(job)], ["check", str(job)], ["results", str(job)], ["dlq", "list"]):
        out = run_cli(settings, *args)
        assert out.returncode == 0 and "error[" not in out.stderr, (args, out.stderr)


def test_purged_items_show_in_status_and_wait_and_dlq_list_has_a_header(make_settings):
    settings = make_settings()
    store = Store.from_url(settings.sync_database_url)
    from tests.jobs import caption_task, create_job

    job = create_job(store, [caption_task(settings.caption_model)], ["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"])
    store.write_dead([DeadRow(job, 0, "not_found", "no such file", "host-7:4242"),
                      DeadRow(job, 1, "truncated", "ends early", "host-7:4242")])
    listing = run_cli(settings, "dlq", "list", "--job", str(job))
    header, *rows = listing.stdout.splitlines()
    assert header.split()[:4] == ["ITEM", "CODE", "ATTEMPTS", "WORKER"] and len(rows) == 2
    assert all("host-7:4242" in row for row in rows)

    purged = run_cli(settings, "dlq", "purge", "--older-than", "0")
    assert purged.returncode == 0 and purged.stdout.strip() == "purged 2 dead letters", purged.stderr
    store.write_dead([DeadRow(job, 2, "empty", "zero bytes", "w")])
    status = json.loads(run_cli(settings, "status", str(job), "--json").stdout)
    assert status == {"job": str(job), "queued": 0, "running": 0, "done": 0, "dead": 1, "purged": 2, "waiting": 0}
    waited = run_cli(settings, "wait", str(job), "--timeout", "5")
    assert waited.returncode == 0 and waited.stdout.split() == ["queued=0", "running=0", "done=0", "dead=1",
                                                                 "purged=2"]
    assert "finished" not in waited.stderr, "no progress bar drawn into a pipe"
    run_cli(settings, "dlq", "purge", "--older-than", "all")
    empty = run_cli(settings, "dlq", "list")
    assert empty.returncode == 0 and empty.stdout == "" and empty.stderr.strip() == "no dead letters"


def test_bad_ages_usage_errors_and_params_are_one_line_in_the_users_words(make_settings, image_root: Path):
    settings = make_settings()
    for args in (["reconcile", "--older-than", "-5"], ["dlq", "purge", "--older-than", "-1d"],
                 ["dlq", "purge", "--older-than", "soon"]):
        assert "0 or 'all'" in _one_error_line(run_cli(settings, *args), "bad_age", 2)
    assert "--help" in _one_error_line(run_cli(settings, "status"), "usage", 2)
    _one_error_line(run_cli(settings, "status", JOB, "--bogus"), "usage", 2)
    (image_root / "a.jpg").write_bytes(jpeg_bytes(32, 32, 1))
    line = _one_error_line(run_cli(settings, "enqueue", "caption", str(image_root / "a.jpg"), "--top-p", "0.5",
                                   "--num-beams", "0", "--min-new-tokens", "9", "--max-new-tokens", "3"),
                           "bad_params", 2)
    for problem in ("--num-beams: ", "--min-new-tokens (9) exceeds --max-new-tokens (3)",
                    "--top-p only applies with sampling (--sample)"):
        assert problem in line
    assert "do_sample" not in line and "num_beams" not in line


def test_help_shows_whole_summaries(make_settings):
    from imgq.cli import app

    env = {"COLUMNS": "200"}
    for group, typer_app in (([], app), *(([g.name], g.typer_instance) for g in app.registered_groups)):
        out = run_cli(make_settings(), *group, "--help", env_extra=env)
        listed = " ".join(out.stdout.split())
        assert not [line for line in out.stdout.splitlines() if line.endswith("...") and "[ARGS]" not in line]
        for info in [*typer_app.registered_commands, *typer_app.registered_groups]:
            assert " ".join(info.short_help.split()) in listed, info.short_help


def test_config_prints_unset_as_unset_and_masks_only_real_secrets(make_settings):
    settings = make_settings(s3_endpoint_url=None, database_url="postgresql://imgq:hunter2@db/imgq")
    out = run_cli(settings, "config").stdout
    assert "# IMGQ_S3_ENDPOINT_URL is unset" in out and "=None" not in out
    assert "hunter2" not in out and "IMGQ_DATABASE_URL=postgresql://imgq:***@db/imgq" in out
    empty = run_cli(make_settings(database_url="postgresql://imgq:@db/imgq"), "config").stdout
    assert "IMGQ_DATABASE_URL=postgresql://imgq:@db/imgq" in empty


def test_the_demo_runs_offline_without_warnings_and_says_how_to_keep_the_services(tmp_path: Path):
    """`make demo` as a fresh machine without the hub runs it: the default models cannot be
    loaded, so it says so and runs on the tiny checkpoints; `--model default` refuses instead."""
    env = _clean_env() | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    strict = subprocess.run([*IMGQ, "demo", "--model", "default", "--workdir", str(tmp_path / "strict")],
                            env=env, capture_output=True, text=True, timeout=60)
    assert strict.returncode == 1 and strict.stderr.startswith("error[model_unavailable]: caption model"), strict
    assert not (tmp_path / "strict" / "pg").exists()  # refused before starting anything
    # Bytes: text=True would read a bar's carriage returns as newlines.
    raw = subprocess.run([*IMGQ, "demo", "--workdir", str(tmp_path / "demo"), "--count", "4"],
                         env=env, capture_output=True, timeout=300)
    assert b"\r" not in raw.stderr, raw.stderr[-500:]  # no progress bar drawn into a pipe
    out = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode())
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in out.stderr.splitlines() if re.search(r"warn", line, re.IGNORECASE)]
    assert warnings == []
    assert "KEEP=1" in out.stdout and re.search(r"^\s+0\s+'", out.stdout, re.MULTILINE)  # a caption row
    assert out.stderr.startswith("note: caption model 'Salesforce/blip-image-captioning-base' is not cached")
    assert "make demo KEEP=1" in out.stdout  # not MODEL=tiny: the same fallback happens again
    assert not (tmp_path / "demo" / "services.json").exists()
    assert uuid.UUID(re.search(r"job_id = '([0-9a-f-]+)'", out.stdout).group(1))  # type: ignore[union-attr]


def test_a_kept_demo_prints_commands_that_reach_its_services_and_stop_them(tmp_path: Path):
    """`imgq demo --keep`: the lines it prints, pasted into a shell as they are, reach the demo's
    services and models (search needed the tiny retrieval model's export) and then stop them."""
    env = _clean_env() | {"HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    folder = tmp_path / "demo"
    out = subprocess.run([*IMGQ, "demo", "--model", "tiny", "--keep", "--workdir", str(folder), "--count", "2"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    try:
        assert out.returncode == 0, out.stderr[-3000:]
        pids = [s["pid"] for s in json.loads((folder / "services.json").read_text())["services"]]
        printed = out.stdout.split("In your shell:\n", 1)[1].splitlines()
        steps = [re.sub(r"\s+#.*$", "", line).strip() for line in printed]
        assert steps[-1].startswith("imgq dev down") and any(s.startswith("imgq search") for s in steps), steps
        shell = subprocess.run(["bash", "-ec", "\n".join(steps)], env=env, cwd=tmp_path, capture_output=True,
                               text=True, timeout=180)
        assert shell.returncode == 0, shell.stderr[-3000:]
        assert "samples/" in shell.stdout and "error[" not in shell.stderr  # results and search found the images
        assert not any(_alive(pid) for pid in pids)
    finally:
        subprocess.run([*IMGQ, "dev", "down", "--dir", str(folder)], env=env, capture_output=True, timeout=60)


def test_the_demo_runs_inside_a_dev_up_session_adding_to_its_allow_lists(tmp_path: Path):
    """README's own session (`eval "$(imgq dev up --s3)"`, IMGQ_LOCAL_ROOTS of your photos), then
    `imgq demo`: the samples were outside IMGQ_LOCAL_ROOTS and the enqueue failed (exit 70, its
    error swallowed); the S3 half of the samples was dropped without a word."""
    env = _clean_env() | {"HF_HUB_OFFLINE": "1"}
    services = tmp_path / "svc"
    up = subprocess.run([*IMGQ, "dev", "up", "--dir", str(services), "--s3"], env=env, capture_output=True,
                        text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        for line in up.stdout.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = shlex.split(value)[0] if value else ""
        (tmp_path / "photos").mkdir()
        env["IMGQ_LOCAL_ROOTS"] = str(tmp_path / "photos")
        out = subprocess.run([*IMGQ, "demo", "--model", "tiny", "--workdir", str(tmp_path / "demo"), "--count", "2"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "IMGQ_S3_ENDPOINT_URL names an S3 endpoint of yours" in out.stderr
        assert re.search(r"2 images \(2 local, 0 in S3\)", out.stderr), out.stderr[-1000:]
        assert "the demo started none" in out.stdout and "stops the services" not in out.stdout
        assert re.search(r"^\s+1\s+'", out.stdout, re.MULTILINE)  # both captioned
    finally:
        subprocess.run([*IMGQ, "dev", "down", "--dir", str(services)], env=env, capture_output=True, timeout=60)


def test_the_demo_stops_as_soon_as_its_worker_cannot_load_the_model(tmp_path: Path):
    """A model that looks loadable but is not (a folder with a config only; or the hub behind a
    proxy that refuses it) ended the worker at once, but the demo sat out `imgq wait`'s 600 s."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    env = _clean_env() | {"HF_HUB_OFFLINE": "1", "IMGQ_CAPTION_MODEL": str(broken)}
    started = time.monotonic()
    out = subprocess.run([*IMGQ, "demo", "--workdir", str(tmp_path / "demo"), "--count", "2"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "worker failed" in out.stderr, out.stderr[-3000:]
    assert "model_unavailable" in out.stderr  # the worker's log tail says why
    assert time.monotonic() - started < 120
