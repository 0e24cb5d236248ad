"""Captions in other languages (issue 12): a caption's language and how it was made, translations
linked to the items that asked for them, and the registry of per-language LoRA adapters.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

IDENTITY = ["image_id", "model", "model_revision", "params_hash", "lang", "method", "via", "via_revision"]


def upgrade() -> None:
    # Every existing caption is BLIP's own English: the defaults describe it, and keep its identity.
    op.add_column("captions", sa.Column("lang", sa.Text, server_default="en", nullable=False))
    op.add_column("captions", sa.Column("method", sa.Text, server_default="native", nullable=False))
    op.add_column("captions", sa.Column("via", sa.Text, server_default="", nullable=False))
    op.add_column("captions", sa.Column("via_revision", sa.Text, server_default="", nullable=False))
    op.add_column("captions", sa.Column("source_id", sa.BigInteger, sa.ForeignKey("captions.id"), nullable=True))
    op.create_check_constraint("captions_method", "captions", "method in ('native', 'translated', 'adapter')")
    op.drop_constraint("captions_identity", "captions", type_="unique")
    op.create_unique_constraint("captions_identity", "captions", IDENTITY)
    op.create_index("captions_source", "captions", ["source_id"], postgresql_where=sa.text("source_id IS NOT NULL"))

    op.create_table(
        "item_translations",
        sa.Column("job_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("lang", sa.Text, primary_key=True),
        sa.Column("caption_id", sa.BigInteger, sa.ForeignKey("captions.id"), nullable=False),
        sa.ForeignKeyConstraint(["job_id", "seq"], ["job_items.job_id", "job_items.seq"], ondelete="CASCADE"),
    )
    op.create_table(
        "adapters",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("lang", sa.Text, nullable=False),
        sa.Column("base_model", sa.Text, nullable=False),
        sa.Column("base_revision", sa.Text, nullable=False),
        sa.Column("location", sa.Text, nullable=False),
        sa.Column("revision", sa.Text, nullable=False),
        sa.Column("metrics", JSONB, server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("adapters")
    op.drop_table("item_translations")
    op.drop_index("captions_source", "captions")
    op.drop_constraint("captions_identity", "captions", type_="unique")
    # An item of an adapter job links its caption in another language, and 0010's downgrade has
    # restored job_items.caption_id's foreign key by now: the link goes with the caption.
    op.execute("UPDATE job_items SET caption_id = NULL WHERE caption_id IN "
               "(SELECT id FROM captions WHERE method <> 'native' OR lang <> 'en')")
    op.execute("DELETE FROM captions WHERE method <> 'native' OR lang <> 'en'")
    op.create_unique_constraint("captions_identity", "captions", ["image_id", "model", "model_revision", "params_hash"])
    op.drop_constraint("captions_method", "captions", type_="check")
    for column in ("source_id", "via_revision", "via", "method", "lang"):
        op.drop_column("captions", column)
