"""Job kinds: a job's task list, image embeddings (pgvector, HNSW cosine), image-text match scores.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_now = sa.text("now()")

# Analysts' nearest-neighbour search, given a query vector (README, example query 5). The 256-d
# case is written out so the planner can use the HNSW expression index. Pass p_revision when a
# model has several revisions stored: their scores are not comparable.
_SIMILAR = """
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
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.add_column("jobs", sa.Column("tasks", postgresql.JSONB, server_default=sa.text("'[]'::jsonb"),
                                    nullable=False))
    op.execute("""
        UPDATE jobs SET tasks = jsonb_build_array(jsonb_build_object(
          'kind', kind, 'model', model, 'params', params, 'params_hash', params_hash))
    """)
    op.create_table(
        "embeddings",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id"), nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("model_revision", sa.Text, nullable=False),
        sa.Column("params_hash", sa.Text, nullable=False),
        sa.Column("params", postgresql.JSONB, nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("embedding", Vector(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.UniqueConstraint("image_id", "model", "model_revision", "params_hash", name="embeddings_identity"),
        sa.CheckConstraint("vector_dims(embedding) = dim", name="embeddings_dim"),
    )
    op.create_index("embeddings_model", "embeddings", ["model", "model_revision", "dim"])
    # pgvector indexes need a fixed dimension: an expression index per dimension in use. 256 is
    # BLIP's projection; another model's dimension gets its own index (README "Search").
    op.execute("CREATE INDEX embeddings_hnsw_256 ON embeddings "
               "USING hnsw ((embedding::vector(256)) vector_cosine_ops) WHERE dim = 256")
    op.create_table(
        "matches",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id"), nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("model_revision", sa.Text, nullable=False),
        sa.Column("params_hash", sa.Text, nullable=False),
        sa.Column("params", postgresql.JSONB, nullable=False),
        sa.Column("text_hash", sa.Text, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("itm_score", sa.Float, nullable=False),
        sa.Column("cosine", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.UniqueConstraint("image_id", "model", "model_revision", "params_hash", "text_hash",
                            name="matches_identity"),
    )
    op.add_column("job_items", sa.Column("text", sa.Text))
    op.add_column("job_items", sa.Column("embedding_id", sa.BigInteger, sa.ForeignKey("embeddings.id")))
    op.add_column("job_items", sa.Column("match_id", sa.BigInteger, sa.ForeignKey("matches.id")))
    op.execute(_SIMILAR)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS imgq_similar(vector, text, integer, text)")
    for column in ("match_id", "embedding_id", "text"):
        op.drop_column("job_items", column)
    op.drop_table("matches")
    op.drop_table("embeddings")
    op.drop_column("jobs", "tasks")
