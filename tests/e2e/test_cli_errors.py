"""The CLI under outages and bad input: clear codes, and nothing accepted is lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

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
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    assert client.llen(settings.queue) == 0
    swept = run_cli(settings, "reconcile", "--older-than", "0")
    assert swept.returncode == 0, swept.stderr
    assert "re-published 1 items" in swept.stdout
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
