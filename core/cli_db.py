"""``imgq db``: the database schema (Alembic migrations) and the HNSW vector indexes."""

from __future__ import annotations

from typing import Annotated

import typer

from imgq.cli_common import _fail, _settings

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Create or migrate the schema to the latest revision."""
    from imgq.db.migrate import upgrade

    settings = _settings()
    upgrade(settings.sync_database_url, revision)
    typer.echo(f"database at {revision}", err=True)


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
