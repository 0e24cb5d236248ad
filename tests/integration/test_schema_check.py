"""The long-running processes check the database's schema revision before they start: an imgq
upgraded without `imgq db upgrade` stops with one line, before its model loads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from typer.testing import CliRunner

from imgq.cli import app
from imgq.db.migrate import alembic_config
from imgq.db.schema import schema_state
from imgq.db.store import make_engine

pytestmark = pytest.mark.integration


@pytest.fixture
def older(database_url: str) -> Iterator[str]:
    """The test database two migrations behind, restored to head afterwards."""
    head = schema_state(make_engine(database_url)).head
    command.downgrade(alembic_config(database_url), "-2")
    try:
        yield head
    finally:
        command.upgrade(alembic_config(database_url), "head")


def _state(database_url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(database_url)
    try:
        return schema_state(engine)
    finally:
        engine.dispose()


def test_a_database_at_head_passes_one_behind_or_empty_is_described(database_url: str) -> None:
    state = _state(database_url)
    assert state.current == (state.head,) and not state.behind and not state.newer and state.describe() is None
    behind = type(state)(("0001",), state.head, state.known)
    assert behind.behind and behind.describe() == (
        f"the database is at revision 0001 and this imgq needs {state.head}: run `imgq db upgrade`")
    empty = type(state)((), state.head, state.known)
    assert empty.behind and empty.describe() == "the database has no imgq schema: run `imgq db upgrade`"
    newer = type(state)(("0099_future",), state.head, state.known)
    assert newer.newer and not newer.behind and "newer than this imgq's migrations" in (newer.describe() or "")
    several = type(state)(("0016", state.head), state.head, state.known)
    assert (several.describe() or "").startswith(f"alembic_version holds several revisions (0016, {state.head})")


@contextmanager
def _no_revision(database_url: str) -> Iterator[None]:
    """imgq's tables with an empty alembic_version; the head row is put back afterwards."""
    engine = make_engine(database_url)
    head = _state(database_url).head
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM alembic_version"))
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM alembic_version"))
            conn.execute(text("INSERT INTO alembic_version VALUES (:head)"), {"head": head})
        engine.dispose()


def test_tables_without_a_revision_are_not_called_an_empty_database(database_url: str) -> None:
    """`imgq db upgrade` would fail creating tables that exist: the advice must not be to run it."""
    with _no_revision(database_url):
        state = _state(database_url)
    assert state.current == () and state.tables and state.behind
    assert (state.describe() or "").startswith("the database holds imgq's tables but no Alembic revision")
    assert "run `imgq db upgrade`" not in (state.describe() or "")


def test_db_upgrade_of_tables_without_a_revision_says_so_instead_of_failing_on_them(database_url: str) -> None:
    with _no_revision(database_url):
        out = CliRunner().invoke(app, ["db", "upgrade"], env={"IMGQ_DATABASE_URL": database_url})
        after = _state(database_url).current
    assert out.exit_code == 1 and after == (), out.output
    assert out.stderr.startswith("error[db_schema]: the database holds imgq's tables but no Alembic revision")
    assert len(out.stderr.splitlines()) == 1


def test_an_unreachable_database_is_a_warning_and_the_process_starts(tmp_path: Path, monkeypatch) -> None:
    """Processes ride out a database outage: one restarted during a failover must not crash-loop."""
    from types import SimpleNamespace

    from imgq.producer import beat as beat_module

    started: list[bool] = []
    monkeypatch.setattr(beat_module, "make_control_app", lambda settings: SimpleNamespace(
        Worker=lambda **_: SimpleNamespace(start=lambda: started.append(True), exitcode=0)))
    out = CliRunner().invoke(app, ["beat", "--consume-only", "--schedule-file", str(tmp_path / "schedule")],
                             env={"IMGQ_DATABASE_URL": f"postgresql+psycopg://postgres@/imgq?host={tmp_path}",
                                  "IMGQ_BACKFILLS": "[]"})
    assert out.exit_code == 0 and started == [True], out.output
    assert out.stderr.startswith("warning[db_unavailable]: the schema revision was not checked (")
    assert out.stderr.endswith("; starting anyway\n") and len(out.stderr.splitlines()) == 1, out.stderr


@pytest.mark.parametrize("command_line", [["worker"], ["api"], ["beat", "--consume-only"]])
def test_worker_api_and_beat_refuse_an_older_schema_before_they_start(
        older: str, database_url: str, tmp_path: Path, command_line: list[str]) -> None:
    env = {"IMGQ_DATABASE_URL": database_url, "IMGQ_CAPTION_MODEL": str(tmp_path / "no-model"),
           "IMGQ_BACKFILLS": "[]"}
    extra = ["--schedule-file", str(tmp_path / "schedule")] if command_line[0] == "beat" else []
    out = CliRunner().invoke(app, [*command_line, *extra], env=env)
    assert out.exit_code == 1, out.output
    # Refused before anything else: the model would be model_unavailable (it does not exist).
    current = _state(database_url).current
    assert out.stderr == (f"error[db_schema]: the database is at revision {', '.join(current)} and this imgq "
                          f"needs {older}: run `imgq db upgrade`\n")


def test_a_newer_schema_is_a_warning_and_the_process_starts(database_url: str, tmp_path: Path, monkeypatch) -> None:
    """A rolling upgrade migrates first: the previous version's processes must still start."""
    from types import SimpleNamespace

    from imgq.producer import beat as beat_module

    started: list[bool] = []
    monkeypatch.setattr(beat_module, "make_control_app", lambda settings: SimpleNamespace(
        Worker=lambda **_: SimpleNamespace(start=lambda: started.append(True), exitcode=0)))
    engine = make_engine(database_url)
    head = _state(database_url).head
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))
        out = CliRunner().invoke(app, ["beat", "--consume-only", "--schedule-file", str(tmp_path / "schedule")],
                                 env={"IMGQ_DATABASE_URL": database_url, "IMGQ_BACKFILLS": "[]"})
    finally:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :head"), {"head": head})
        engine.dispose()
    assert out.exit_code == 0 and started == [True], out.output
    assert out.stderr == (f"warning[db_newer]: the database is at revision 0099_future, newer than this imgq's "
                          f"migrations (head {head}): a newer imgq migrated it; starting anyway\n")
