"""`imgq db vector-index build` after a build that was interrupted (imgq.db.admin)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text

from imgq import errors
from imgq.db.admin import build_vector_index

pytestmark = pytest.mark.integration

DEFINITION = "USING hnsw (((embedding)::vector({dim})) vector_cosine_ops) WHERE (dim = {dim})"


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def index_state(engine: Engine, name: str) -> tuple[bool, bool, str] | None:
    """(indisvalid, indisready, definition) of the index, or None."""
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT x.indisvalid, x.indisready, pg_get_indexdef(x.indexrelid) FROM pg_index x "
            "WHERE x.indexrelid = to_regclass(:n)"), {"n": name}).first()
    return None if row is None else (row[0], row[1], row[2])


def make_invalid(engine: Engine, name: str) -> None:
    """What an interrupted CREATE INDEX CONCURRENTLY leaves: the index, marked invalid (and, if it
    stopped before its build, not ready). The test database's user is a superuser."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE pg_index SET indisvalid = false, indisready = false "
                          "WHERE indexrelid = to_regclass(:n)"), {"n": name})


@pytest.mark.parametrize("dim", [256, 512])
def test_a_build_replaces_an_index_an_interrupted_build_left_invalid(engine: Engine, dim: int):
    name = f"embeddings_hnsw_{dim}"
    if dim != 256:
        build_vector_index(engine, dim, maintenance_work_mem="64MB")
    make_invalid(engine, name)
    assert index_state(engine, name)[:2] == (False, False)  # type: ignore[index]
    build_vector_index(engine, dim, maintenance_work_mem="64MB")
    valid, ready, definition = index_state(engine, name)  # type: ignore[misc]
    assert (valid, ready) == (True, True)
    assert definition.endswith(DEFINITION.format(dim=dim))
    # A valid index is left as it is: a second build is a no-op.
    with engine.connect() as conn:
        oid = conn.execute(text("SELECT to_regclass(:n)::oid"), {"n": name}).scalar_one()
    build_vector_index(engine, dim, maintenance_work_mem="64MB")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT to_regclass(:n)::oid"), {"n": name}).scalar_one() == oid


def test_a_build_that_leaves_no_valid_index_says_so(engine: Engine):
    """Whatever keeps CREATE INDEX CONCURRENTLY IF NOT EXISTS from making the index valid (here an
    event trigger marks it invalid again as soon as it is built), the build does not report
    success."""
    with engine.begin() as conn:
        conn.execute(text("""
CREATE FUNCTION spoil_hnsw() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass('embeddings_hnsw_300');
END $$"""))
        conn.execute(text("CREATE EVENT TRIGGER spoil ON ddl_command_end WHEN TAG IN ('CREATE INDEX') "
                          "EXECUTE FUNCTION spoil_hnsw()"))
    with pytest.raises(errors.VectorIndexError, match=r"embeddings_hnsw_300 is not valid after the build"):
        build_vector_index(engine, 300, maintenance_work_mem="64MB")
