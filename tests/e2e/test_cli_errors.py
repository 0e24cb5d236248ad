"""The CLI under outages and bad input: clear codes, and nothing accepted is lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from tests.e2e.helpers import jpeg_bytes, run_cli

pytestmark = pytest.mark.e2e


def test_broker_down_at_enqueue_keeps_the_job_and_reconcile_publishes_it(
    make_settings, redis_server, image_root: Path, tmp_path: Path
):
    (image_root / "a.jpg").write_bytes(jpeg_bytes(32, 32, 1))
    dead_broker = make_settings(broker_url=f"redis+socket://{tmp_path}/nobody.sock")
    out = run_cli(dead_broker, "enqueue", "caption", str(image_root / "a.jpg"))
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    assert "warning[publish_failed]" in out.stderr and job in out.stderr

    settings = make_settings()
    status = run_cli(settings, "status", job, "--json")
    assert '"queued": 1' in status.stdout  # accepted: committed in Postgres
    assert '"waiting": 1' in status.stdout  # and not in the broker: the feeder publishes it
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    assert client.llen(settings.queue) == 0
    swept = run_cli(settings, "reconcile", "--older-than", "0")
    assert swept.returncode == 0, swept.stderr
    # Fed from the backlog, not taken as lost: it had never been published.
    assert swept.stdout == "re-published 1 items (0 published over 0 s ago and not final)\n"
    assert client.llen(settings.queue) == 1


def test_database_down_at_enqueue_accepts_nothing(make_settings, image_root: Path, tmp_path: Path):
    (image_root / "a.jpg").write_bytes(jpeg_bytes(32, 32, 1))
    settings = make_settings(database_url=f"postgresql+psycopg://postgres@/imgq?host={tmp_path}")
    out = run_cli(settings, "enqueue", "caption", str(image_root / "a.jpg"))
    assert out.returncode == 1
    assert out.stderr.startswith("error[db_unavailable]: nothing was accepted; cannot use Postgres")
    assert "Traceback" not in out.stderr


def test_missing_refs_file_is_a_clear_error(make_settings, tmp_path: Path):
    out = run_cli(make_settings(), "enqueue", "caption", "-f", str(tmp_path / "nope.txt"))
    assert out.returncode == 2
    assert out.stderr.startswith("error[bad_file]: cannot read") and "nope.txt" in out.stderr


JOB = "0b8f7f5e-1111-4222-8333-944455556666"


def _one_error_line(out, code: str, rc: int) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == rc, (out.returncode, out.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error[{code}]: "), out.stderr
    assert "Traceback" not in out.stderr


def test_every_command_with_the_database_down_prints_one_line(make_settings, tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    settings = make_settings(database_url=f"postgresql+psycopg://postgres@/imgq?host={tmp_path}")
    commands = [["status", JOB], ["wait", JOB, "--timeout", "1"], ["results", JOB], ["check", JOB],
                ["dlq", "list"], ["dlq", "retry", "--code", "not_found"], ["dlq", "purge", "--older-than", "30d"],
                ["reconcile"], ["db", "upgrade"]]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda args: run_cli(settings, *args), commands))
    for args, out in zip(commands, outs, strict=True):
        assert "IMGQ_DATABASE_URL" in out.stderr, args
        _one_error_line(out, "db_unavailable", 1)


def test_an_unknown_job_is_not_found_in_every_command_that_takes_one(make_settings):
    from concurrent.futures import ThreadPoolExecutor

    settings = make_settings()
    commands = [["status", JOB], ["wait", JOB], ["results", JOB], ["check", JOB], ["dlq", "list", "--job", JOB],
                ["dlq", "retry", "--job", JOB], ["reconcile", "--job", JOB]]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda args: run_cli(settings, *args), commands))
    for out in outs:
        _one_error_line(out, "not_found", 1)


def test_bad_filters_and_settings_are_refused_by_name(make_settings):
    settings = make_settings()
    out = run_cli(settings, "dlq", "list", "--code", "nonsense")
    _one_error_line(out, "bad_filter", 2)
    assert "not_found" in out.stderr and "wrong_model" in out.stderr  # the valid codes are listed
    _one_error_line(run_cli(settings, "dlq", "retry", "--code", "nonsense"), "bad_filter", 2)
    out = run_cli(settings, "status", JOB, env_extra={"IMGQ_MAX_BATCH": "-1"})
    _one_error_line(out, "config_error", 2)
    assert "IMGQ_MAX_BATCH (got '-1')" in out.stderr
    out = run_cli(settings, "dlq", "list")
    assert out.returncode == 0 and out.stderr.strip() == "no dead letters"


def test_debug_shows_the_traceback(make_settings, tmp_path: Path):
    settings = make_settings(database_url=f"postgresql+psycopg://postgres@/imgq?host={tmp_path}")
    out = run_cli(settings, "--debug", "status", JOB)
    # The traceback, then the documented line and exit code, as without --debug.
    assert out.returncode == 1 and "Traceback" in out.stderr
    assert out.stderr.splitlines()[-1].startswith("error[db_unavailable]: cannot use Postgres"), out.stderr[-500:]


def test_an_s3_prefix_that_cannot_be_listed_accepts_nothing_and_says_so(make_settings, store):
    settings = make_settings(s3_endpoint_url="http://127.0.0.1:9", allowed_buckets=["photos"])  # 9: nothing listens
    count = text("SELECT count(*) FROM jobs")
    with store.engine.connect() as conn:
        before = conn.execute(count).scalar_one()
    out = run_cli(settings, "enqueue", "caption", f"s3://{settings.allowed_buckets[0]}/photos/")
    _one_error_line(out, "s3_error", 1)
    assert "nothing was accepted; cannot list S3 (IMGQ_S3_ENDPOINT_URL)" in out.stderr
    with store.engine.connect() as conn:
        assert conn.execute(count).scalar_one() == before
