"""What the CLI leaves behind and prints for scripts: `imgq results -o FILE` replaces FILE only once
the export is complete (an interrupted one leaves the old file whole, and no temporary file), with a
progress bar on a terminal; `--json` outputs name their job and give ISO 8601 times; a Postgres that
accepts connections but never answers is db_unavailable after the connect timeout, not a hang; Ctrl-C
is one error[interrupted] line with exit 130."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imgq.cli import app
from imgq.db.store import DeadRow, Store, make_engine
from tests.jobs import caption_task, create_job

pytestmark = pytest.mark.integration

IMGQ = [sys.executable, "-m", "imgq.cli"]


def _job(store: Store, n: int) -> uuid.UUID:
    return create_job(store, [caption_task("m")], [f"/d/{i}.jpg" for i in range(n)])


def _env(database_url: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")} | {"IMGQ_DATABASE_URL": database_url}


# -- results -o: all or nothing -------------------------------------------------------------------

def _interrupted_after(rows: int, exc: BaseException):  # type: ignore[no-untyped-def]
    """A Store.results that yields ``rows`` rows, then raises ``exc`` (Ctrl-C, a lost connection)."""
    def results(self: Store, job: uuid.UUID) -> Iterator[dict[str, Any]]:
        for seq in range(rows):
            yield {"seq": seq, "ref": f"/d/{seq}.jpg", "state": "queued"}
        raise exc

    return results


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("connection lost")])
def test_an_interrupted_export_leaves_the_old_file_whole_and_no_temporary_file(
        store: Store, database_url: str, tmp_path: Path, monkeypatch, exc: BaseException) -> None:
    job = _job(store, 3)
    target = tmp_path / "results.jsonl"
    target.write_text("the old export\n")
    monkeypatch.setattr(Store, "results", _interrupted_after(1000, exc))
    out = CliRunner().invoke(app, ["results", str(job), "-o", str(target)], env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code != 0
    assert target.read_text() == "the old export\n", "an unfinished export must not touch the old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"], "the temporary file is removed"


def test_a_full_disk_is_a_bad_file_and_leaves_the_old_file_whole(store: Store, database_url: str,
                                                                  tmp_path: Path, monkeypatch) -> None:
    job = _job(store, 3)
    target = tmp_path / "results.jsonl"
    target.write_text("the old export\n")
    monkeypatch.setattr(Store, "results", _interrupted_after(10, OSError(28, "No space left on device")))
    out = CliRunner().invoke(app, ["results", str(job), "-o", str(target)], env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code == 2
    assert out.stderr.strip() == (f"error[bad_file]: cannot write {target}: No space left on device "
                                  f"({target} is unchanged)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]
    assert target.read_text() == "the old export\n"


def test_a_folder_that_refuses_a_new_file_or_the_rename_still_gets_the_export(
        store: Store, database_url: str, tmp_path: Path, monkeypatch) -> None:
    """A writable file in a folder this user cannot write (or a sticky folder refusing the rename):
    written as before, not refused (root passes every permission check, so the refusals are made)."""
    import imgq.cli_jobs as cli_jobs

    job = _job(store, 3)
    env = {"IMGQ_DATABASE_URL": database_url}
    target = tmp_path / "results.jsonl"
    real_open, real_replace = os.open, os.replace

    def no_new_file(path: Any, *args: Any, **kw: Any) -> int:
        if str(path).endswith(".tmp"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kw)

    target.write_text("old\n")
    monkeypatch.setattr(cli_jobs.os, "open", no_new_file)
    out = CliRunner().invoke(app, ["results", str(job), "-o", str(target)], env=env)
    monkeypatch.setattr(cli_jobs.os, "open", real_open)
    assert out.exit_code == 0, out.output
    assert len(target.read_text().splitlines()) == 3 and "writing it in place" in out.stderr

    def no_rename(src: Any, dst: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    target.write_text("old\n")
    monkeypatch.setattr(cli_jobs.os, "replace", no_rename)
    out = CliRunner().invoke(app, ["results", str(job), "-o", str(target)], env=env)
    monkeypatch.setattr(cli_jobs.os, "replace", real_replace)
    assert out.exit_code == 0, out.output
    assert len(target.read_text().splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_a_complete_export_replaces_the_file_and_keeps_its_mode(store: Store, database_url: str,
                                                                tmp_path: Path) -> None:
    job = _job(store, 3)
    target = tmp_path / "results.csv"
    target.write_text("the old export\n" * 100)
    target.chmod(0o640)
    out = CliRunner().invoke(app, ["results", str(job), "--format", "csv", "-o", str(target)],
                             env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code == 0, out.output
    lines = target.read_text().splitlines()
    assert lines[0].startswith("seq,ref,state") and len(lines) == 4
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
    fresh = tmp_path / "new.jsonl"
    out = CliRunner().invoke(app, ["results", str(job), "-o", str(fresh)], env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code == 0, out.output
    assert [json.loads(line)["seq"] for line in fresh.read_text().splitlines()] == [0, 1, 2]
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask, "a new file gets the mode open() would give it"


def test_an_export_through_a_symlink_or_to_a_device_writes_where_it_points(store: Store, database_url: str,
                                                                          tmp_path: Path) -> None:
    job = _job(store, 2)
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    env = {"IMGQ_DATABASE_URL": database_url}
    out = CliRunner().invoke(app, ["results", str(job), "-o", str(link)], env=env)
    assert out.exit_code == 0, out.output
    assert link.is_symlink() and len(real.read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "real.jsonl"]
    out = CliRunner().invoke(app, ["results", str(job), "-o", os.devnull], env=env)
    assert out.exit_code == 0, out.output
    assert Path(os.devnull).is_char_device(), "a device is written, never replaced"


def test_an_export_to_a_folder_or_a_missing_folder_is_a_bad_file(store: Store, database_url: str,
                                                                 tmp_path: Path) -> None:
    job = _job(store, 1)
    for target in (tmp_path, tmp_path / "missing" / "r.jsonl"):
        out = CliRunner().invoke(app, ["results", str(job), "-o", str(target)],
                                 env={"IMGQ_DATABASE_URL": database_url})
        assert out.exit_code == 2 and out.stderr.startswith(f"error[bad_file]: cannot write {target}: "), out.output
    assert list(tmp_path.iterdir()) == []


def _on_a_terminal(args: list[str], env: dict[str, str], until: str | None = None,
                   then: signal.Signals | None = None) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal: (exit code, what it wrote there). With ``until``:
    once that text has appeared, send ``then``."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # else 0 columns: no bar
    proc = subprocess.Popen([*IMGQ, *args], env=env, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen, sent = b"", False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal's other end closed: the process has ended
                    break
                if not chunk:
                    break
                seen += chunk
            if until is not None and not sent and until.encode() in seen:
                assert then is not None
                proc.send_signal(then)
                sent = True
            if proc.poll() is not None and not ready:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(10), seen.decode(errors="replace")


def test_an_export_to_a_file_shows_a_progress_bar_on_a_terminal_only(store: Store, database_url: str,
                                                                     tmp_path: Path) -> None:
    job = _job(store, 5)
    target = tmp_path / "r.jsonl"
    rc, shown = _on_a_terminal(["results", str(job), "-o", str(target)], _env(database_url))
    assert rc == 0, shown
    assert "5row" in shown.replace(" ", "") or "5 row" in shown, shown
    assert len(target.read_text().splitlines()) == 5
    piped = subprocess.run([*IMGQ, "results", str(job), "-o", str(target)], env=_env(database_url),
                           capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr == "", "no bar when stderr is not a terminal"


# -- Ctrl-C ---------------------------------------------------------------------------------------

def test_ctrl_c_is_one_interrupted_error_line_with_exit_130(store: Store, database_url: str) -> None:
    job = _job(store, 2)  # never finishes: no worker. Interrupted once it polls (its bar shows the counts)
    rc, shown = _on_a_terminal(["wait", str(job)], _env(database_url), until="purged=", then=signal.SIGINT)
    assert rc == 130, shown
    lines = [line.strip() for line in shown.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == "error[interrupted]: aborted", shown
    assert shown.count("error[") == 1 and "Traceback" not in shown


# -- a Postgres that never answers ------------------------------------------------------------------

@pytest.fixture
def silent_postgres() -> Iterator[int]:
    """A loopback port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_the_engine_has_a_10s_connect_timeout_unless_one_is_given(monkeypatch) -> None:
    from sqlalchemy import event

    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)

    class Stop(Exception):
        pass

    def connect_params(url: str, **kwargs: Any) -> dict[str, Any]:
        engine = make_engine(url, **kwargs)
        seen: dict[str, Any] = {}

        @event.listens_for(engine, "do_connect")
        def capture(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
            seen.update(cparams)
            raise Stop

        with pytest.raises(Stop):
            engine.connect()
        return seen

    url = "postgresql+psycopg://u:p@127.0.0.1:1/none"
    assert connect_params(url)["connect_timeout"] == 10
    assert connect_params(url + "?connect_timeout=30")["connect_timeout"] == "30"
    given = connect_params(url, connect_args={"connect_timeout": 3, "application_name": "x"})
    assert given["connect_timeout"] == 3 and given["application_name"] == "x"
    assert connect_params(url, connect_args={"application_name": "x"})["connect_timeout"] == 10
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "2")  # libpq's own variable, which psycopg reads
    assert "connect_timeout" not in connect_params(url)


def test_a_postgres_that_never_answers_is_db_unavailable_not_a_hang(silent_postgres: int) -> None:
    env = _env(f"postgresql+psycopg://u:p@127.0.0.1:{silent_postgres}/none") | {"PGCONNECT_TIMEOUT": "2"}
    started = time.monotonic()
    out = subprocess.run([*IMGQ, "status", "0b8f7f5e-1111-4222-8333-944455556666"], env=env, capture_output=True,
                         text=True, timeout=60)
    took = time.monotonic() - started
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error[db_unavailable]: cannot use Postgres"), out.stderr
    assert "timeout" in lines[0]
    assert took < 30, took


# -- --json outputs ------------------------------------------------------------------------------

def test_status_and_cancel_json_name_the_job(store: Store, database_url: str) -> None:
    job = _job(store, 2)
    env = {"IMGQ_DATABASE_URL": database_url}
    status = CliRunner().invoke(app, ["status", str(job), "--json"], env=env)
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout) == {"job": str(job), "queued": 2, "running": 0, "done": 0, "dead": 0,
                                         "purged": 0, "waiting": 2}
    assert list(json.loads(status.stdout)) == ["job", "queued", "running", "done", "dead", "purged", "waiting"]
    cancel = CliRunner().invoke(app, ["cancel", str(job), "--json"], env=env)
    assert cancel.exit_code == 0, cancel.output
    assert list(json.loads(cancel.stdout).items()) == [
        ("job", str(job)), ("cancelled_now", 2), ("queued", 0), ("running", 0), ("done", 0), ("dead", 0),
        ("cancelled", 2), ("purged", 0)]


def _iso(value: str) -> dt.datetime:
    assert "T" in value and " " not in value, value
    parsed = dt.datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


def test_dlq_list_and_apikey_list_json_give_iso_8601_times(store: Store, database_url: str) -> None:
    job = _job(store, 1)
    store.claim(job, [0], "w1")
    store.write_dead([DeadRow(job, 0, "not_an_image", "no", "w1")])
    env = {"IMGQ_DATABASE_URL": database_url}
    dead = CliRunner().invoke(app, ["dlq", "list", "--json"], env=env)
    assert dead.exit_code == 0, dead.output
    row = json.loads(dead.stdout)
    assert list(row) == ["job_id", "seq", "ref", "code", "message", "attempts", "worker", "created_at"]
    assert row["job_id"] == str(job)
    _iso(row["created_at"])

    made = CliRunner().invoke(app, ["apikey", "create", "--tenant", "acme-iso"], env=env)
    assert made.exit_code == 0, made.output
    keys = CliRunner().invoke(app, ["apikey", "list", "--tenant", "acme-iso", "--json"], env=env)
    assert keys.exit_code == 0, keys.output
    key = json.loads(keys.stdout)
    _iso(key["created_at"])
    assert key["revoked_at"] is None and key["last_used_at"] is None
    key_id = key["id"]
    assert CliRunner().invoke(app, ["apikey", "revoke", key_id], env=env).exit_code == 0
    revoked = json.loads(CliRunner().invoke(app, ["apikey", "list", "--tenant", "acme-iso", "--json"],
                                            env=env).stdout)
    _iso(revoked["revoked_at"])
