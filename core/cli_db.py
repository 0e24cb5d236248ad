"""``imgq db``: the database schema (Alembic migrations) and the HNSW vector indexes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from imgq.cli_common import _fail, _settings
from imgq.cli_errors import first_line

if TYPE_CHECKING:
    from imgq.db.schema import SchemaState

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision: head (the latest), a revision id "
                                                       "such as 0017, or +N steps. A revision the database is "
                                                       "already past leaves it as it is.")] = "head") -> None:
    """Create or migrate the schema, to the latest revision unless another is given; never downgrades.

    Prints the revision the database is at afterwards, read back from it."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from imgq.db.migrate import alembic_config

    settings = _settings()
    config = alembic_config(settings.sync_database_url)
    script = ScriptDirectory.from_config(config)
    relative = any(sign in revision for sign in "+-")  # resolved by alembic against the database
    if not relative and _resolve(script, revision) is None:
        _fail("bad_revision", _unknown(script, revision))
    state = _state(settings.sync_database_url)
    before = state.current
    if not before and state.tables:  # Alembic would start from nothing and fail on the existing tables
        _fail("db_schema", state.describe() or "", 1)
    if state.newer:  # Alembic would fail with "Can't locate revision"
        unknown = [rev for rev in before if rev not in state.known]
        _fail("db_newer", f"the database is at revision {', '.join(unknown)}, which this imgq's migrations "
              f"({_known(script)}) do not have: a newer imgq migrated it; run that version (`upgrade` never "
              "downgrades)", 1)
    try:
        command.upgrade(config, revision)
    except CommandError as exc:
        if relative and _resolve(script, revision) is None:
            _fail("bad_revision", _unknown(script, revision, first_line(exc)))
        raise
    after = _state(settings.sync_database_url).current
    at = ", ".join(after) or "base"
    if after == before:
        target = _resolve(script, revision)
        if target is not None and set(target) == set(after):
            typer.echo(f"database at {at} (already there: nothing to do)", err=True)
        else:
            typer.echo(f"database at {at} (already past {revision}: `upgrade` never downgrades)", err=True)
    else:
        was = ", ".join(before) if before else "an empty database"
        typer.echo(f"database at {at} (upgraded from {was})", err=True)


def _resolve(script: Any, revision: str) -> tuple[str, ...] | None:
    """The revision ids ``revision`` names (() for base), or None if the migrations have no such revision."""
    from alembic.util import CommandError

    try:
        return tuple(r.revision for r in script.get_revisions(revision) if r is not None)
    except (CommandError, ValueError, KeyError):
        return None


def _known(script: Any) -> str:
    ids = [r.revision for r in script.walk_revisions()][::-1]
    return f"{ids[0]} to {ids[-1]}" if ids else "none"


def _unknown(script: Any, revision: str, why: str | None = None) -> str:
    return (f"unknown revision {revision!r}{f' ({why})' if why else ''}: give head, or a revision of this imgq's "
            f"migrations ({_known(script)})")


def _state(database_url: str) -> SchemaState:
    """Where the database's schema stands, read from it (``.current``: () before the first migration)."""
    from imgq.db.schema import schema_state
    from imgq.db.store import make_engine

    engine = make_engine(database_url)
    try:
        return schema_state(engine)
    finally:
        engine.dispose()


@db_app.command("vector-index")
def db_vector_index(
    action: Annotated[str, typer.Argument(help="drop (before a large backfill) or build (after it).")],
    dim: Annotated[int, typer.Option(min=1, max=16000, help="Embedding dimension of the index.")] = 256,
) -> None:
    """Drop or (re)build the HNSW index of one embedding dimension, without blocking writes.

    Writes with the index present run at 400-1,150 rows/s on a small Postgres, far below a GPU
    worker's rate; without it, ~14,000 rows/s, and building it afterwards is 4-5x faster overall
    (docs/performance.md). Searches scan exactly while the index is absent."""
    from imgq.db.admin import build_vector_index, drop_vector_index
    from imgq.db.store import make_engine

    if action not in ("drop", "build"):
        _fail("bad_request", f"action must be drop or build, not {action!r}")
    engine = make_engine(_settings().sync_database_url)
    try:
        if action == "drop":
            typer.echo("dropped" if drop_vector_index(engine, dim) else "no such index", err=True)
        else:
            build_vector_index(engine, dim)
            typer.echo(f"built embeddings_hnsw_{dim}", err=True)
    finally:
        engine.dispose()


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(db_app, name="db")
