"""imgq_similar returns k rows when k exist, in order, and uses any dimension's own HNSW index.

The function of migration 0003 ran its HNSW scan with the caller's settings: pgvector's default
``hnsw.ef_search`` (40) capped k = 100 at 40 rows, and a revision filter cut them further (no
iterative scan). Its other dimensions ordered by the untyped ``embedding <=> q``, which no
expression index can serve, so ``imgq db vector-index build --dim 512`` did not help it.

Now, as ``imgq search`` (db/search.py):

* A dimension N with a valid HNSW cosine index on ``embedding::vector(N)`` where ``dim = N``
  (``embeddings_hnsw_256`` of 0003, or one that ``imgq db vector-index build --dim N`` made) is
  searched through it, in dynamic SQL with N written in: the index's expression, and its predicate
  as a literal. Any other dimension, or one whose index is dropped or invalid, is an exact scan.
* Through an index, ``hnsw.ef_search`` is raised to ``least(1000, greatest(64, 2k))`` (never below
  the caller's own), and ``hnsw.iterative_scan = relaxed_order`` lets a filter still fill k. The
  nearest rows are sorted again outside a materialized CTE, on ``distance + 0``: relaxed order
  may return them slightly out of order, and Postgres 17+ would take the CTE's own ORDER BY as
  having sorted them.
* Nothing leaks into the caller's transaction: iterative_scan is the function's SET clause
  (restored when it returns), and ef_search is set with ``set_config(..., true)`` and put back.
  An error aborts the caller's (sub)transaction, which undoes both.

``hnsw.max_scan_tuples`` stays the caller's (pgvector's default: 20,000 tuples), which bounds how
selective a filter can be and still fill k.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

SIMILAR = """
CREATE OR REPLACE FUNCTION imgq_similar(q vector, p_model text, k integer DEFAULT 20, p_revision text DEFAULT NULL)
RETURNS TABLE (image_id bigint, source text, bucket text, key text, model_revision text, similarity float8)
LANGUAGE plpgsql STABLE
SET hnsw.iterative_scan = relaxed_order
AS $$
DECLARE
  d integer := vector_dims(q);
  indexed boolean;
  distance text := 'e.embedding <=> $1';
  ef text;
BEGIN
  IF q IS NULL OR k IS NULL OR k < 1 THEN
    RETURN;
  END IF;
  SELECT EXISTS (
    SELECT 1 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
    JOIN pg_am am ON am.oid = i.relam JOIN pg_opclass oc ON oc.oid = x.indclass[0]
    WHERE x.indrelid = 'embeddings'::regclass AND x.indisvalid AND x.indnatts = 1
      AND am.amname = 'hnsw' AND oc.opcname = 'vector_cosine_ops'
      AND pg_get_expr(x.indexprs, x.indrelid) = format('(embedding)::vector(%s)', d)
      AND pg_get_expr(x.indpred, x.indrelid) = format('(dim = %s)', d)
  ) INTO indexed;
  IF indexed THEN
    distance := format('e.embedding::vector(%s) <=> $1::vector(%s)', d, d);
    ef := current_setting('hnsw.ef_search', true);
    PERFORM set_config('hnsw.ef_search',
                       least(1000, greatest(64, 2 * k, coalesce(ef::integer, 0)))::text, true);
  END IF;
  RETURN QUERY EXECUTE format($sql$
    WITH nn AS MATERIALIZED (
      SELECT e.image_id, e.model_revision, %1$s AS distance
      FROM embeddings e
      WHERE e.model = $2 AND e.dim = %2$s AND ($4::text IS NULL OR e.model_revision = $4)
      ORDER BY %1$s
      LIMIT $3
    )
    SELECT nn.image_id, im.source, im.bucket, im.key, nn.model_revision, 1 - nn.distance
    FROM nn JOIN images im ON im.id = nn.image_id
    ORDER BY nn.distance + 0, nn.image_id
  $sql$, distance, d) USING q, p_model, k, p_revision;
  IF ef IS NOT NULL THEN
    PERFORM set_config('hnsw.ef_search', ef, true);
  END IF;
END $$;
"""

# Migration 0003's definition, restored by the downgrade (CREATE OR REPLACE also drops the SET clause).
SIMILAR_0003 = """
CREATE OR REPLACE FUNCTION imgq_similar(q vector, p_model text, k integer DEFAULT 20, p_revision text DEFAULT NULL)
RETURNS TABLE (image_id bigint, source text, bucket text, key text, model_revision text, similarity float8)
LANGUAGE plpgsql STABLE AS $$
BEGIN
  IF vector_dims(q) = 256 THEN
    RETURN QUERY
      SELECT e.image_id, im.source, im.bucket, im.key, e.model_revision,
             1 - (e.embedding::vector(256) <=> q::vector(256))
      FROM embeddings e JOIN images im ON im.id = e.image_id
      WHERE e.model = p_model AND e.dim = 256 AND (p_revision IS NULL OR e.model_revision = p_revision)
      ORDER BY e.embedding::vector(256) <=> q::vector(256) LIMIT k;
  ELSE
    RETURN QUERY
      SELECT e.image_id, im.source, im.bucket, im.key, e.model_revision, 1 - (e.embedding <=> q)
      FROM embeddings e JOIN images im ON im.id = e.image_id
      WHERE e.model = p_model AND e.dim = vector_dims(q) AND (p_revision IS NULL OR e.model_revision = p_revision)
      ORDER BY e.embedding <=> q LIMIT k;
  END IF;
END $$;
"""


def upgrade() -> None:
    op.execute(SIMILAR)


def downgrade() -> None:
    op.execute(SIMILAR_0003)
