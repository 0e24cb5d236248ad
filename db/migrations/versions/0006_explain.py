"""Caption explanations: each explained caption's per-token cross-attention summary.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "caption_explanations",
        sa.Column("caption_id", sa.BigInteger, sa.ForeignKey("captions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("grid_rows", sa.Integer, nullable=False),
        sa.Column("grid_cols", sa.Integer, nullable=False),
        sa.Column("input_size", sa.Integer, nullable=False),
        sa.Column("heads", sa.Text, nullable=False),
        sa.Column("layers", sa.Text, nullable=False),
        sa.Column("tokens", JSONB, nullable=False),
        sa.Column("words", JSONB, nullable=False),
        sa.Column("maps", sa.LargeBinary, nullable=False),
        sa.Column("overlays", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("caption_explanations")
