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


def test_downgrade_past_0008_with_an_item_linked_to_an_adapter_caption(database_url: str) -> None:
    """0008's downgrade deletes the captions the old schema cannot hold (other languages); 0010's
    downgrade has restored job_items.caption_id's foreign key by then, so an item of an adapter
    job (linked to its German caption) refused the delete. The link is cleared first."""
    import uuid

    from alembic import command

    from imgq.db.migrate import alembic_config, upgrade

    job = uuid.uuid4()
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO jobs (id, kind, model, params, params_hash, total) "
                              "VALUES (:j, 'caption', 'm', '{}', 'h', 2)"), {"j": job})
            image = conn.execute(text("INSERT INTO images (source, bucket, key, version, bytes, width, height) "
                                      "VALUES ('s3', 'b', 'k', 'v', 1, 1, 1) RETURNING id")).scalar_one()
            caption = text("INSERT INTO captions (image_id, model, model_revision, params_hash, params, text, lang, "
                           "method, via, source_id) VALUES (:i, 'm', 'r', 'h', '{}', :t, :lang, :method, :via, :src) "
                           "RETURNING id")
            english = conn.execute(caption, {"i": image, "t": "a cat", "lang": "en", "method": "native", "via": "",
                                             "src": None}).scalar_one()
            german = conn.execute(caption, {"i": image, "t": "eine Katze", "lang": "de", "method": "adapter",
                                            "via": "de-news", "src": None}).scalar_one()
            conn.execute(caption, {"i": image, "t": "un chat", "lang": "fr", "method": "translated", "via": "nllb",
                                   "src": english})
            conn.execute(text("INSERT INTO job_items (job_id, seq, ref, state, image_id, caption_id) VALUES "
                              "(:j, 0, 's3://b/k', 'done', :i, :de), (:j, 1, 's3://b/k', 'done', :i, :en)"),
                         {"j": job, "i": image, "de": german, "en": english})
    finally:
        engine.dispose()
    config = alembic_config(database_url)
    command.downgrade(config, "0007")
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            items = conn.execute(text("SELECT seq, caption_id FROM job_items ORDER BY seq")).all()
            texts = conn.execute(text("SELECT text FROM captions")).scalars().all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in items] == [(0, None), (1, english)] and texts == ["a cat"]
    command.downgrade(config, "base")
    upgrade(database_url)


def test_an_adapter_registered_before_0016_reads_with_no_config_digest(database_url: str) -> None:
    """0016 adds ``adapters.config_sha256``: a row registered before it keeps working, its config unchecked
    (NULL) until the adapter is registered again; the downgrade drops the column and keeps the row."""
    from alembic import command

    from imgq.db.adapters import Adapters
    from imgq.db.migrate import alembic_config, upgrade

    config = alembic_config(database_url)
    command.downgrade(config, "0015")
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO adapters (name, lang, base_model, base_revision, location, revision) "
                              "VALUES ('de-news', 'de', 'm', 'r', '/data/adapters/de-news', :rev)"), {"rev": "ab" * 32})
        upgrade(database_url)
        record = Adapters(engine).get("de-news")
        assert record is not None and record.revision == "ab" * 32 and record.config_sha256 is None
        command.downgrade(config, "0015")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM adapters")).scalars().all() == ["de-news"]
    finally:
        engine.dispose()
    upgrade(database_url)
    assert _diff(database_url) == []
