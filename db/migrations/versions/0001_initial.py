"""Initial schema: jobs, job items, images, captions, dead letters.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_now = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("params", postgresql.JSONB, nullable=False),
        sa.Column("params_hash", sa.Text, nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("source", sa.Text, sa.CheckConstraint("source in ('s3', 'local')"), nullable=False),
        sa.Column("bucket", sa.Text, server_default="", nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.UniqueConstraint("source", "bucket", "key", "version", name="images_object_version"),
    )
    op.create_table(
        "captions",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id"), nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("model_revision", sa.Text, nullable=False),
        sa.Column("params_hash", sa.Text, nullable=False),
        sa.Column("params", postgresql.JSONB, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.UniqueConstraint("image_id", "model", "model_revision", "params_hash", name="captions_identity"),
    )
    op.create_table(
        "job_items",
        sa.Column("job_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("ref", sa.Text, nullable=False),
        sa.Column("state", sa.Text, server_default="queued", nullable=False),
        sa.Column("attempts", sa.Integer, server_default="0", nullable=False),
        sa.Column("worker", sa.Text),
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id")),
        sa.Column("caption_id", sa.BigInteger, sa.ForeignKey("captions.id")),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.CheckConstraint("state in ('queued', 'running', 'done', 'dead')", name="job_items_state"),
    )
    op.create_index("job_items_pending", "job_items", ["state", "updated_at"],
                    postgresql_where=sa.text("state in ('queued', 'running')"))
    op.create_table(
        "dead_letters",
        sa.Column("job_id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("ref", sa.Text, nullable=False),
        sa.Column("code", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("worker", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
        sa.ForeignKeyConstraint(["job_id", "seq"], ["job_items.job_id", "job_items.seq"], ondelete="CASCADE"),
    )
    op.create_index("dead_letters_code", "dead_letters", ["code"])


def downgrade() -> None:
    for table in ("dead_letters", "job_items", "captions", "images", "jobs"):
        op.drop_table(table)
