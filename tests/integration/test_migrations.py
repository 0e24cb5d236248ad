"""The Alembic migrations create exactly what ``db/models.py`` declares, and downgrade cleanly."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from imgq.db.models import Base

pytestmark = pytest.mark.integration


# pgvector's per-dimension expression indexes cannot be declared on the models' columns; they are
# compared by their definition below instead.
EXPRESSION_INDEXES = {
    "embeddings_hnsw_256": "USING hnsw (((embedding)::vector(256)) vector_cosine_ops) WHERE (dim = 256)",
}


def _skip_expression_indexes(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    return not (type_ == "index" and name in EXPRESSION_INDEXES)


def _diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            opts = {"compare_type": True, "include_object": _skip_expression_indexes}
            ctx = MigrationContext.configure(conn, opts=opts)
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    # The fixture's database is cloned from a template migrated to head.
    assert _diff(database_url) == []
    engine = create_engine(database_url)
    with engine.connect() as conn:
        query = text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'embeddings'")
        found = dict(conn.execute(query).all())
    engine.dispose()
    for name, definition in EXPRESSION_INDEXES.items():
        assert name in found and found[name].endswith(definition), found.get(name)


def test_downgrade_to_base_and_upgrade_again(database_url: str) -> None:
    from alembic import command

    from imgq.db.migrate import alembic_config, upgrade

    command.downgrade(alembic_config(database_url), "base")
    upgrade(database_url)
    assert _diff(database_url) == []


def test_vector_index_can_be_dropped_for_a_backfill_and_rebuilt(database_url: str) -> None:
    from imgq.db.admin import build_vector_index, drop_vector_index

    engine = create_engine(database_url)
    try:
        assert drop_vector_index(engine, 256) is True
        assert drop_vector_index(engine, 256) is False
        build_vector_index(engine, 256, maintenance_work_mem="64MB")
    finally:
        engine.dispose()
    assert _diff(database_url) == []
    engine = create_engine(database_url)
    with engine.connect() as conn:
        found = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'embeddings_hnsw_256'")).scalar()
    engine.dispose()
    assert found.endswith(EXPRESSION_INDEXES["embeddings_hnsw_256"])
